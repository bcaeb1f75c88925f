def pytest_configure(config):
    "Silence third-party deprecation noise that says nothing about this package"
    for f in ["ignore:`torch.jit.script` is deprecated:FutureWarning",
              "ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning",
              "ignore:load_learner` uses Python's insecure pickle:UserWarning",
              "ignore:The 'mode.chained_assignment' option is deprecated",
              "ignore:numpy.core is deprecated:DeprecationWarning"]:
        config.addinivalue_line('filterwarnings', f)
