"""The loading side: `make_loader` (`loader`), index-level samplers and orders (`samplers`), augmentation,
byte readers and the DALI and torch backends. Reads `crackio.format`; never imports the writing side."""
