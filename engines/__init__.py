"""fsr.engines"""
