"""Training the generator: the four setups of the thesis, data, losses, the loop and its run folder."""
