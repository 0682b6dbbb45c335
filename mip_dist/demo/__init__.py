"""The embedded demo, a user of the framework: a synthetic visible-infrared set made on demand (people,
render, synthetic, prepare), resuming a demo run that was cut off (resume) and the MIP-vs-baseline
ablation (ablation). Nothing in the core packages imports it."""
