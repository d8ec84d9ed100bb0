"""Store backends behind the protocols of `base.py`, one module each; `rocksdb.py` is the embedded one."""
