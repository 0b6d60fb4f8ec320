"""fsr.runtime"""
