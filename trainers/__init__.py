"""The vdm_tf training program: `python -m trainers.main`."""
