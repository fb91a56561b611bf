"""Training of the bundled models: ``python -m fourbit.training.train --model fashion-dit --minutes 8 --out DIR``.

Import ``fourbit.training.train`` (``TrainConfig``, ``train``) and ``fourbit.training.ema`` (``EMA``) directly;
this package imports nothing eagerly so that ``python -m fourbit.training.train`` runs cleanly.
"""
