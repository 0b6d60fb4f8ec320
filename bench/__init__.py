"""fsr.bench"""
