"""speckv_eval: reproduce the seed tables and measure gamma policies honestly."""
