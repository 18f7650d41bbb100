// Sample app: streams a completion into a TextView. Put a model at
// src/main/assets/model.plm first (see ../README.md).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.pocketlm.sample"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.pocketlm.sample"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    // The model is copied out of the APK once and then memory-mapped; storing it
    // uncompressed keeps that copy cheap.
    androidResources {
        noCompress += "plm"
    }

    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions {
        jvmTarget = "17"
    }
}

dependencies {
    implementation(project(":pocketlm"))
    implementation("net.java.dev.jna:jna:5.14.0@aar")
}
