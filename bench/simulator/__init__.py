"""`alise bench simulate`: a discrete-event simulation of a cluster of workers driven by the live scheduler's
own policy code and LiveState snapshot builder (see cluster.py)."""
