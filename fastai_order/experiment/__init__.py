"Comparing orders: the run's settings, data, one run, the results store, statistics and report, engines, schedulers and the compare command"
