"""Default calibration text for delta attention's thresholds (`Engine.calibrate_delta` when no text is given):
a few paragraphs of ordinary prose, dialogue, instructions and code, written for this project. The thresholds
only set how large a query change must be to be applied, so any ordinary text of a few hundred tokens serves."""

CALIBRATION_TEXT = """\
The harbour town woke before the sun. Fishing boats slipped out past the breakwater one after another, their \
engines coughing in the cold air, while the bakery on the corner opened its shutters and set the first trays of \
bread on the counter. By seven the market square was full: crates of oranges from the south, onions in braided \
strings, buckets of mussels still wet from the sea. An old man sold knives and sharpened them while you waited; a \
girl with a notebook counted the gulls on the church roof and wrote the numbers in neat columns.

"You're late again," said Marta, without looking up from the ledger.
"The tram broke down at the bridge," Tomas answered. "Everyone had to walk the last mile."
"Then you should have left earlier. The inspector comes at nine, and the figures for March still do not add up."
He hung his coat on the hook, poured two cups of coffee, and sat down beside her. Together they went through the \
receipts line by line until they found it: a delivery of rope entered twice, once in pounds and once in kilograms.

How to make a simple vegetable soup: wash and chop two carrots, one onion, two sticks of celery and a large potato. \
Warm a spoonful of oil in a pot, add the onion and cook it gently for five minutes. Add the other vegetables, a \
litre of stock and a pinch of salt. Bring it to the boil, then lower the heat and let it simmer for twenty minutes, \
until the potato is soft. Season with pepper and fresh parsley, and serve it with bread.

Questions and answers. What is the boiling point of water at sea level? One hundred degrees Celsius. Why does the \
moon show phases? Because we see different parts of its sunlit half as it travels around the Earth. Who keeps the \
lighthouse running now that the keeper has retired? An automatic lamp, checked by an engineer once a month.

def moving_average(values, window):
    \"\"\"Return the averages of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages

In the evening the wind turned and brought rain from the west. The boats came home early, one by one, and the \
harbour master wrote their names on the board as they tied up. Lights came on in the windows above the square. \
Somewhere a radio played an old song about a sailor who never returned, and a dog barked at the thunder until its \
owner called it inside. Tomorrow, the forecast said, would be calm and clear.
"""
