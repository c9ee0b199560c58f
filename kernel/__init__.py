"""The ground floor: what every other floor stands on and nothing here knows about battles or models.

errors (what a user can fix), files (atomic writes, JSON, content keys, the overwrite rule), schema
(the base of every config section), context (what a stage or block is handed besides data), dist
(this process's rank in a multi-process launch), local_models (checkpoint directories and devices).
"""
