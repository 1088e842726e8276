"""LingBot-World (camera-controlled Wan I2V): the Plücker camera encoder and its node."""
