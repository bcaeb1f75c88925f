"The model: the order spec, the op registry (what a module is), and the layers and models built in an order"
