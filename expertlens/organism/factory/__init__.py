"""Build tools for the organisms: the data generator, the tokenizer builder, training and evaluation.

Not imported at run time (``import expertlens`` never loads this package). Train the default organism with
``python -m expertlens.organism.factory.train --arch olmoe --out DIR``.
"""

__all__: list[str] = []
