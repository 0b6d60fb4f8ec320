"""fsr.models"""
