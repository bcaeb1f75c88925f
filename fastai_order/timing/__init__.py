"Where time goes: one clock, BatchTimer, LayerTimer, the paired-timing harness, W&B logging"
