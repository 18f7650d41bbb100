// The pocketlm AAR: generated Kotlin bindings (bindings/kotlin, package uniffi.pocketlm),
// JNA, and libpocketlm.so per ABI under src/main/jniLibs (built by ../build-rust.sh).
plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "uniffi.pocketlm"
    compileSdk = 35

    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk {
            abiFilters += listOf("arm64-v8a", "x86_64")
        }
    }

    sourceSets {
        getByName("main") {
            // The checked-in generated bindings, used in place (scripts/gen-bindings.sh).
            kotlin.srcDir("../../bindings/kotlin")
            // libpocketlm.so for each ABI, written by ../build-rust.sh (cargo-ndk).
            jniLibs.srcDir("src/main/jniLibs")
        }
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
    // The AAR flavour carries JNA's own libjnidispatch.so for every Android ABI.
    implementation("net.java.dev.jna:jna:5.14.0@aar")
}
