"""The battle table: reading, validating, repairing, swapping and folding battles (one schema: columns)."""
from battles.columns import LABEL_COLUMNS
from battles.folds import make_folds, prompt_groups
from battles.io import BattleDataError, RepairReport, battles_from_frame, battles_to_frame, data_hash, read_battles
from battles.labels import CLASS_NAMES, has_labels, label_index, label_matrix, swap_battles, swap_columns
