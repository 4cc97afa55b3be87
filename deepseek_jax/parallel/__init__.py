"""Device mesh and logical-axis partitioning rules."""
