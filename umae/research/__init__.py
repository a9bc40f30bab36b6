"""The research tools: `umae eval` (evaluate), the sweeps (sweep) and `umae reproduce`."""
