"""Visual attention: a house-number reader (Xu et al. 2015, "Show, Attend and Tell") on
generated street-number crops."""
