"""Studies of exploding gradients and clipping: each script writes tables, figures and a JSON result."""
