"""The replicated store on pysyncobj: commit, read barrier, leadership confirmation and role-change
events (store.py), and the pysyncobj configuration (conf.py)."""
