"""Data beyond the user's training file: converters of external sets (messages: chat messages to
turns), de-duplication, distribution shift, the config's external sources, pairing chat logs into
battles, and pseudo-labelling. It stands on the battle table (:mod:`battles`) and the kernel."""
