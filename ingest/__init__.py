"""Turns files dropped in the inbox into normalized 224x224 radiographs or typed rejections.

Owns: DICOM reading, the pixel pipeline (shared with training), the inbox watcher.
May import: covid_cxr (settings, errors), db (to record instances); never the queue (the
composition root passes the publishing functions in) and never TensorFlow.
"""
