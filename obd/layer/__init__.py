"""Layer operations: open a blob through its wrappers, write one, overlaybd's tools as functions, export;
and overlaybd's stock base layer (:mod:`obd.layer.baselayer`)."""
