"""Video QC an editor would run: is there sound when sound was asked for, is the picture black or frozen, and
what does the video look like (poster and contact sheet).

`rivya_pipeline.probe.inspect_video` measures it all in the probe's single pass; `measures` and `pictures` do the
work per frame (numpy, Pillow), `thresholds` holds the settings and `checks` the verdicts. This package imports
none of them, so code that only judges (`checks`) never loads numpy or Pillow.
"""
