"""The model and its budget: layer roles, the adapter methods, building the budgeted classifier,
the exact count of trainable parameters, and the planner that spends a budget."""
