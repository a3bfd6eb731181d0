"""Command-line interface: ``properlm <command>``, one module per command.

* :mod:`~properlm.cli.main` -- the ``properlm`` parser and the dispatch to a command;
* :mod:`~properlm.cli.train` -- ``properlm train`` (options onto :class:`~properlm.training.config.TrainConfig`);
* :mod:`~properlm.cli.evaluate` -- ``properlm evaluate`` (options onto
  :class:`~properlm.evaluation.settings.EvalSettings`);
* :mod:`~properlm.cli.generate` -- ``properlm generate``: decode sources to a file;
* :mod:`~properlm.cli.compare` -- ``properlm compare``: options and printing (the logic is in
  :mod:`properlm.evaluation`);
* :mod:`~properlm.cli.demo` -- ``properlm demo``, the paper's recipe end to end on CPU;
* :mod:`~properlm.cli.demo_data` -- the demo's data set (numbers in digits -> English words).

How-to: [the command line and YAML configs](../how-to/command-line.md).
"""
