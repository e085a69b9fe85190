# Class heatmaps and Grad-CAM maps of a labelled folder, shared by the processes a launcher starts:
#   torchrun --nproc_per_node N interpret_distributed.py model.pkl folder/ class_heatmaps.png
import sys
from fastai.learner import load_learner
from fastai.data.transforms import get_image_files
from fastai_heatmap.all import *

learn = load_learner(sys.argv[1])
files = get_image_files(sys.argv[2])
p = processes()                                   # the launcher's processes, joined in one group
with learn.no_bar():
    interp = HeatmapInterpretation.from_learner(learn, dl=learn.dls.test_dl(files, with_labels=True)) # each process predicts its share
    ch = interp.class_heatmaps()                  # each process explains its share; the sums are added up
    maps = gather_cat(learn.heatmap(shard(files))) # a list of images shared out by hand
if p.main:
    ch.show().savefig(sys.argv[3])
    print(f"{p.size} processes: {len(interp.losses)} losses, {maps.shape[0]} maps, counts per class {ch.counts.tolist()}")
