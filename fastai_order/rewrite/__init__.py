"Rewriting a model's order: the shared torch.fx machinery, swap_order, the commutation rules and optimize_order with its proof"
