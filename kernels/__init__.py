from . import sources

sources.install_locators()  # before any kernel module is decorated: see kernels/sources.py
