"""Hardware: device profiles (what each device can run, what it costs) and the cost model."""
