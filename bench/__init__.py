"""`loraquilt bench serve`: loraquilt against transformers + PEFT, side by side, one run."""
