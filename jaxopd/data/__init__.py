from jaxopd.data.packing import BestFitPackDataset, ConcatThenSplitDataset, pack_best_fit
