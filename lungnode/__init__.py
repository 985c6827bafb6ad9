"""lungnode: a DICOM node for lung CT.

It receives CT series over DICOM, decides when each series is complete,
classifies it with a Keras CNN, explains the verdict with Grad-CAM and sends
the results back into the same study.
"""

__version__ = "0.1.0"
