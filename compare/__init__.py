"""fsr.compare"""
