"""Prompt texts for the fault tests that share no KV block with one another (a prefix-cache
hit on the server shifts its chunk boundaries, and bf16 numerics follow the chunk shapes)."""

PRESS = ("The history of the printing press begins in the fifteenth century, when Johannes "
         "Gutenberg combined movable metal type, oil-based ink and a screw press. ")
RIVER = ("A quiet river ran through the valley, and every spring the farmers along its banks "
         "watched the water rise over the low fields. ")
SHIP = ("The old ship left the harbour before dawn, its crew of eleven sailors hauling on the "
        "ropes while the captain read the sky for signs of the storm. ")
GARDEN = ("My grandmother kept a garden behind the house where tomatoes, beans and tall yellow "
          "sunflowers grew in crooked rows. ")
