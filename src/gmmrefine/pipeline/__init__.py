"""gmmrefine.pipeline"""
