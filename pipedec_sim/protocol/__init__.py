"""The sans-IO scheduler: messages, the prediction tree, expansion policies, per-stage KV
bookkeeping, pacing, knobs and the strategies. Imports nothing else of the project, and
neither simpy, torch nor pandas."""
