"""`python -m vdm_tf.compression encode|decode ...` (`vdm_tf.compression.cli`)."""

from vdm_tf.compression import cli

cli.run()
