import warnings
warnings.filterwarnings('ignore', message='.*torch.jit.script.*')
warnings.filterwarnings('ignore', message='.*weight_norm.*')
