"""Positional schemes (RoPE + scalings, ALiBi, xPos, absolute) and position-id generators."""
