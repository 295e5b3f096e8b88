"""The single-stage engine shared by ToCo, FSR, TSD-CAM, TSCD."""
