"""`nbdev-proc-nbs`, without its first step that installs Quarto (with sudo and a download) when it is missing: the
site is rendered by docs/nb2md.py and mkdocs instead. Everything else is nbdev's: it refreshes nbs/nbdev.yml and the
module index, and writes the processed notebooks (with their `show_doc` entries) to _proc/."""
import nbdev.quarto as q

q._ensure_quarto = lambda: None
if __name__ == "__main__": q.nbdev_proc_nbs.__wrapped__()  # not force=True: that also rewrites the custom sidebar.yml
