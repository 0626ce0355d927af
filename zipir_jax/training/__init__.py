"""Progressive ZipIR training (§3.1, §3.2, §4): state, step, checkpoints, reporting, the loop."""
