"""Long-context evaluation of a checkpoint: needle-in-a-haystack retrieval over a length x depth grid (`niah`) and
loss by position bucket past the trained window (`perplexity`); `python -m jaxopd.evaluate niah|perplexity --help`."""
