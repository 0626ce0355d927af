r"""Trains one stage of ZipIR: ``python train.py --config=configs/tiny.py:vae_coarse --workdir=runs/tiny``.

Stages run in order (vae_coarse -> vae_fine -> pixel_decoder -> dit; the SD-VAE ablation of
configs/sdvae_f32c64.py: vae -> dit) with the same --workdir; each reads the previous stage's export
from WORKDIR/<stage>/export (or config.train.init_from.<stage>) and refuses with the producing
command when it is missing. Runs resume from the latest checkpoint.
Override any field: --config.optim.num_steps=10 --config.train.mesh='(2,4,1)'.
Multi-host: --distributed (TPU pods / SLURM auto-detect) or --coordinator=host:port
--num_processes=N --process_id=i.

Exit status: 0 the stage finished and exported; 75 (EX_TEMPFAIL of sysexits.h, "temporary failure;
retry") preempted: a SIGTERM (on any process of a multi-host run) stopped it after writing a
checkpoint, and the same command resumes from it; 2 a mistake in the config, the data or a file
(one line on stderr), or max_nonfinite non-finite updates in a row; 1 a bad --config.KEY.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from zipir_jax import config_lib, errors

# Preempted after a checkpoint: a scheduler requeues the job (sysexits.h EX_TEMPFAIL).
EXIT_PREEMPTED = 75

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file[:stage]", lock_config=True)
flags.DEFINE_string("workdir", None, "run folder; one sub-folder per stage")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (auto-detected cluster)")
flags.DEFINE_string("coordinator", "", "host:port of process 0 (explicit multi-process setup)")
flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator)")
flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from zipir_jax import parallel
  from zipir_jax.training import loop  # imported first: from initialize on, a SIGTERM is a notice

  # pylint: enable=g-import-not-at-top
  if FLAGS.distributed or FLAGS.coordinator:
    parallel.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  config_file = config_flags.get_config_filename(FLAGS["config"]).partition(":")[0]
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, config_file=config_file)
  except loop.Preempted as e:
    logging.warning("%s; exit status %d", e, EXIT_PREEMPTED)
    sys.exit(EXIT_PREEMPTED)
  except errors.ZipIRError as e:  # a mistake in the config, the data or a file: one line
    logging.error("%s", e)
    print(f"train.py: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.flags_parser)
