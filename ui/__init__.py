"""The dashboard: one module per screen (wizard, matrix, tradeoffs, runs, compare), layout wires them."""
