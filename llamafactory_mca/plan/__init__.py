"""`llamafactory-mca plan`: memory per rank, batch arithmetic and layout search before any GPU is used.

  meta.py     each pipeline stage's rank built on `meta` under torch's fake process group; parameter census
  memory.py   bytes per rank by component (weights, main grads, optimizer, activations, logits) and peaks
  cost.py     throughput estimate, constants from our benchmark results
  search.py   every valid layout that fits, ranked; the smallest change that makes a recipe fit
  planner.py  one layout's plan; recipe.py the recipe's keys; report.py text and --plot; command.py the CLI
"""
