"""fsr.export"""
